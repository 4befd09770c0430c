"""`python -m client`: see client.cli for the command line."""

import sys

from client.commands import main

sys.exit(main())
