# Copies out of the receive area (see _copy.h for why not plain memcpy).

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_FromStringAndSize
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize


cdef extern from "_copy.h" nogil:
    void iouz_copy(void *dst, const void *src, size_t n)


cdef inline bytes copy_to_bytes(const char *data, Py_ssize_t length):
    result = PyBytes_FromStringAndSize(NULL, length)
    iouz_copy(PyBytes_AS_STRING(result), data, <size_t>length)
    return result


cdef inline bytearray copy_to_bytearray(const char *data, Py_ssize_t length):
    result = PyByteArray_FromStringAndSize(NULL, length)
    iouz_copy(PyByteArray_AS_STRING(result), data, <size_t>length)
    return result
