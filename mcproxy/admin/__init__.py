"""The admin API: gRPC servicer (in the supervisor), typed client and ``mcproxyctl``.

``v1/`` holds the code generated from ``proto/mc_proxy/v1/admin.proto``
(``make proto``); everything else here is written by hand.
"""
