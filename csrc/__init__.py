"""C++ and CUDA sources of the `fastdelta_C` extension (the "cpp" backend).

Installed as the package `fastdelta.csrc` (setup.py `package_dir`) so that the sources ship with
every install, editable or not: the first use of the cpp backend compiles them just in time
(see `fastdelta.ops._extension`) unless setup.py built them (`FASTDELTA_BUILD_EXT=1`).
"""
