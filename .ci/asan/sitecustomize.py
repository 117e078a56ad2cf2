# Loaded first by the AddressSanitizer test run in .ci/run (through PYTHONPATH). Triton's
# extension throws a C++ exception at import that ASan's interceptor cannot handle, and nothing
# there needs Triton (torch works without it), so it is made unimportable.
import sys

sys.modules["triton"] = None
