from livescope.daemon.cli import main

raise SystemExit(main())
