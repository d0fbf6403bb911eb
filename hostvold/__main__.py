import sys

from hostvold.server.daemon import main

sys.exit(main())
