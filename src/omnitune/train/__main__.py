import sys

from omnitune.train.trainer import main

sys.exit(main())
