"""`python -m server --model DIR ...`: the shoal front process."""

import sys

from server.app import main

sys.exit(main())
