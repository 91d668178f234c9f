import sys

from paxlite.cli import main

sys.exit(main())
