"""``python -m jaxopt_serve`` runs the command line."""

import sys

from jaxopt_serve.cli import main

sys.exit(main())
