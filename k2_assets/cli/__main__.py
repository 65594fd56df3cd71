import sys

from k2_assets.cli import main

sys.exit(main())
