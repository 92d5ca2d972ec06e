from kernelpool.cli import main

raise SystemExit(main())
