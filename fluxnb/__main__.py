from .base.interrupts import exit_on_interrupt
from .cli import main

exit_on_interrupt(main())
