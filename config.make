# shellcheck shell=sh
# nginx addon interface: configure sources this file while it writes objs/Makefile.
# ./config ran before, in the same shell, and sourced auto/rust.

ngx_gpu_make_rules
