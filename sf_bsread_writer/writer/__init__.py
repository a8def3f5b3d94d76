"""The writer: one acquisition, driven over REST, from the buffer's replay (or a live stream) into one HDF5 file.

``service`` (the Writer: REST entry points, one run thread), ``run_loop``
(the run thread's body), ``outputs`` (allowed paths, the file or
/dev/null), ``rest`` (the Bottle app), ``cli`` (``sf_bsread_writer``).
The decisions are pure and live in ``writer.acquisition`` and
``writer.pulse_range``; the file format is ``h5``.
"""
