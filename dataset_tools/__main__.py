import sys

from dataset_tools.cli import main

sys.exit(main())
