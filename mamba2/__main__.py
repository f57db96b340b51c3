from mamba2.cli import main

raise SystemExit(main())
