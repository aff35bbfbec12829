import sys

from cryogs.cli import main

sys.exit(main())
