"""Generated from ``proto/mc_proxy/v1/admin.proto`` by ``make proto``; do not edit the modules."""
