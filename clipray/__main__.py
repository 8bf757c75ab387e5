import sys

from clipray.cli import main

sys.exit(main())
