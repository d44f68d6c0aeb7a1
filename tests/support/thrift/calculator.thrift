// A small Thrift service for tests/test_thrift.py. The tests run Debian's thrift compiler
// (`thrift --gen py`) on this file into a temporary folder; nothing generated is committed.

namespace py sidecar_test_calc

exception DivideByZero {
  1: string message
  2: i64 dividend
}

struct Pair {
  1: i64 a
  2: i64 b
  3: string label
  4: list<string> tags
}

struct Result {
  1: i64 value
  2: string label
  3: list<string> tags
}

service Calculator {
  // label "crash" makes the handler raise an undeclared error (INTERNAL_ERROR to the client)
  Result add(1: Pair pair)
  Result divide(1: Pair pair) throws (1: DivideByZero oops)
}
