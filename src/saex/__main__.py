from saex.cli import main

raise SystemExit(main())
