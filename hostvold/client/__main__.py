"""python -m hostvold.client: hostvolctl."""

import sys

from hostvold.client.main import main

sys.exit(main())
