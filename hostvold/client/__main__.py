"""python -m hostvold.client: hostvolctl."""

import sys

from hostvold.client.cli import main

sys.exit(main())
