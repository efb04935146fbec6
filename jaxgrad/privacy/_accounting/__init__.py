"""The parts of :mod:`jaxgrad.privacy.accounting`, one idea a module; import from there.

* :mod:`.checks` — the arguments every part takes (δ, steps, the accountant's name);
* :mod:`.library` — dp-accounting itself: its import, its logging, its accountant objects;
* :mod:`.events` — dp-accounting events: DP-SGD's, their plain data, their leaf mechanisms;
* :mod:`.pld_size` — the PLD's size, estimated before it is built, and the RDP fallback;
* :mod:`.epsilon` — ε of DP-SGD steps or of recorded events, guarded against breakdown;
* :mod:`.accountant` — :class:`Accountant`, the events a loop records;
* :mod:`.calibrate` — σ for a target ε.
"""
