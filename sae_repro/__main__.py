import sys

from sae_repro.cli import main

sys.exit(main())
