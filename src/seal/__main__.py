from seal.cli import main

raise SystemExit(main())
