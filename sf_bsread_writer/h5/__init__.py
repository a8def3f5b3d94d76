"""The SwissFEL HDF5 file: ``layout`` (the contract readers rely on), ``columns`` (one channel's storage),
``packed`` (the fast path for many scalar channels), ``placement`` (where the file lives), ``variants``
(a type change merged into the original's layout at close), ``file`` (H5File: rows in, blocks out, crash safe)."""
