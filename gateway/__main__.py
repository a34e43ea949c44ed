"""`python -m gateway` is `abc-gateway`."""

import sys

from gateway.cli import main

sys.exit(main())
