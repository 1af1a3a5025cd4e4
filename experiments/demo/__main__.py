import sys

from experiments.demo.cli import main

sys.exit(main())
