import sys

from mambamim.cli.main import main

sys.exit(main())
