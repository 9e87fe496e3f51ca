"""Dev tooling for the demo, the tests and the benchmarks (nothing in the product path imports it).

`services`: Debian's docker-registry, an S3 server (moto) and nginx on loopback, skopeo pushes.
`ocibuild`: OCI image layouts built from tar members, for test and demo images.
"""
