import sys

from mcproxy.cli import main

sys.exit(main())
