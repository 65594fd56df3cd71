"""Builds k2_assets.core._vendor_scan from vendor_scan.c at install (setup.py's cffi_modules)."""

from pathlib import Path

from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef(
    """
    int64_t k2_scan(const uint8_t *data, int64_t size, int n_fields, const int *types, void **values, uint8_t **text);
    int64_t k2_join_numbers(const uint8_t *prefix, int64_t prefix_size, const int64_t *numbers, int64_t n, int32_t *offsets,
                            uint8_t *data);
    """
)
ffibuilder.set_source(
    "k2_assets.core._vendor_scan", Path(__file__).with_name("vendor_scan.c").read_text(), extra_compile_args=["-O2"]
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
