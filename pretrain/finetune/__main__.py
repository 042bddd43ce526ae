import sys

from pretrain.finetune.cli import main

sys.exit(main())
