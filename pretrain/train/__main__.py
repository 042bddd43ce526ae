import sys

from pretrain.train.cli import main

sys.exit(main())
