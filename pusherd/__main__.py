"""python -m pusherd"""

from pusherd.cli import main

raise SystemExit(main())
