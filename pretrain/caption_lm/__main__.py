import sys

from pretrain.caption_lm.cli import main

sys.exit(main())
