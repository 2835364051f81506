from sae_repro.cli import main
import sys

sys.exit(main())
