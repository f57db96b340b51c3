from mamba2.lm import main

raise SystemExit(main())
