"""OpenDelta's `opendelta.utils` import paths: `fastdelta.utils.inspect` and
`fastdelta.utils.visualization`."""
