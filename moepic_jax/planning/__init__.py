"""Planning: what to cache and where to split, under one VRAM budget (MoEpic, arXiv 2509.08342, §4).

  profiles.py   ModelProfile, HardwareProfile, CachePlan (values with a JSON form)
  planner.py    the cost model and the fixed-point solver (NumPy only, checked against brute force)
  plans.py      each policy's plan from the profiles and a cache budget
  calibrate.py  measuring the profiles: routing of calibration text, the copy-time curve, compute times
"""
