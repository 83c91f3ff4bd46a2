"""`python -m exporter` runs the exporter like the `prefect-exporter` command."""

import sys

from exporter.cli import main

sys.exit(main())
