import sys

from pretrain.instruct.cli import main

sys.exit(main())
