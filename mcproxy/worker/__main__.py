import sys

from mcproxy.worker.main import main

sys.exit(main())
