from jspec.cli import main

raise SystemExit(main())
