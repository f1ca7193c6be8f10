from __future__ import annotations

from edgenas.cli import main

raise SystemExit(main())
