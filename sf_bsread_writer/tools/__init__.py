"""Tools around the services: ``simulate`` (a bsread source, ``sf_bsread_simulate``) and ``demo`` (``make demo``)."""
