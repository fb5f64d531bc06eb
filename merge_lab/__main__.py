import sys

from merge_lab.cli import main

sys.exit(main())
