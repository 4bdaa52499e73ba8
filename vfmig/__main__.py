import sys

from vfmig.cli import main

sys.exit(main())
