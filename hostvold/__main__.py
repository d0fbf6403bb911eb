import sys

from hostvold.daemon import main

sys.exit(main())
