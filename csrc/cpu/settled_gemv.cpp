// A fused LoRA layer's settled decode calls (route gemv, one fp32 adapter) served from C++: whether the layer, the
// dispatch settings and the input are still what the calls were settled for is a list of guards read here, then
// dense_lora_gemv runs. Made from Python, those checks cost as much as the GEMV over a small layer's weight; here
// they are a few dict lookups and pointer comparisons. fastpeft/guards.py states each guard's meaning in Python
// (the tests hold the two to the same answers) and builds the lists.
#include <ATen/autocast_mode.h>
#include <torch/csrc/autograd/python_variable.h>

#include <string>
#include <vector>

#include "ops_shared.h"

namespace fastpeft {
namespace {

// The guard kinds of fastpeft/guards.py (same numbers).
enum GuardKind : int64_t {
  kItemIs = 0,       // container[key] is expected (a dict's missing key reads None)
  kItemEqual = 1,    // container[key] == expected
  kItemFalsy = 2,    // not container[key]
  kAttrIs = 3,       // getattr(container, key) is expected
  kAttrFalsy = 4,    // not getattr(container, key)
  kLengthIs = 5,     // len(container) == expected
  kLacks = 6,        // key not in container
  kNotDropping = 7,  // not (container["training"] and container["p"] > 0): a dropout module's __dict__
  kAttrEqual = 8,    // getattr(container, key) == expected
};

struct Guard {
  int64_t kind;
  py::object container, key, expected;
  Py_ssize_t length = 0;  // kLengthIs
};

// container[key] as a new reference; a missing key (or any lookup error) reads None.
PyObject* item_of(PyObject* container, PyObject* key) {
  PyObject* value;
  if (PyDict_CheckExact(container)) {
    value = PyDict_GetItemWithError(container, key);
    Py_XINCREF(value);
  } else {
    value = PyObject_GetItem(container, key);
  }
  if (value == nullptr) {
    PyErr_Clear();
    Py_INCREF(Py_None);
    value = Py_None;
  }
  return value;
}

// truth of value: 1, 0, or -1 where value is null or asking raised (error cleared); steals the reference.
int truth(PyObject* value) {
  if (value == nullptr) {
    PyErr_Clear();
    return -1;
  }
  const int t = PyObject_IsTrue(value);
  Py_DECREF(value);
  if (t < 0) PyErr_Clear();
  return t;
}

// value is expected (same) or == expected; false where value is null (a failed lookup, error cleared) or the
// comparison raised. Steals value's reference.
bool matches(PyObject* value, PyObject* expected, bool same) {
  if (value == nullptr) {
    PyErr_Clear();
    return false;
  }
  const int eq = same ? value == expected : PyObject_RichCompareBool(value, expected, Py_EQ);
  Py_DECREF(value);
  if (eq < 0) PyErr_Clear();
  return eq == 1;
}

bool guard_holds(const Guard& g) {
  PyObject* c = g.container.ptr();
  PyObject* k = g.key.ptr();
  switch (g.kind) {
    case kItemIs:
      return matches(item_of(c, k), g.expected.ptr(), true);
    case kItemEqual:
      return matches(item_of(c, k), g.expected.ptr(), false);
    case kItemFalsy:
      return truth(item_of(c, k)) == 0;
    case kAttrIs:
      return matches(PyObject_GetAttr(c, k), g.expected.ptr(), true);
    case kAttrFalsy:
      return truth(PyObject_GetAttr(c, k)) == 0;
    case kAttrEqual:
      return matches(PyObject_GetAttr(c, k), g.expected.ptr(), false);
    case kLengthIs: {
      const Py_ssize_t n = PyObject_Length(c);
      if (n < 0) PyErr_Clear();
      return n == g.length;
    }
    case kLacks: {
      const int in = PySequence_Contains(c, k);
      if (in < 0) PyErr_Clear();
      return in == 0;
    }
    case kNotDropping: {
      static PyObject* const training = PyUnicode_InternFromString("training");
      static PyObject* const p_name = PyUnicode_InternFromString("p");
      const int drops = truth(item_of(c, training));
      if (drops <= 0) return drops == 0;
      PyObject* p = item_of(c, p_name);
      PyObject* zero = PyLong_FromLong(0);
      const int gt = PyObject_RichCompareBool(p, zero, Py_GT);
      Py_DECREF(zero);
      Py_DECREF(p);
      if (gt < 0) PyErr_Clear();
      return gt == 0;
    }
    default:
      return false;
  }
}

std::vector<Guard> parse_guards(const py::sequence& guards) {
  std::vector<Guard> out;
  out.reserve(guards.size());
  for (const py::handle item : guards) {
    const py::tuple t = py::reinterpret_borrow<py::tuple>(item);
    TORCH_CHECK(t.size() == 4, "fastpeft._C.SettledGemv: a guard is (kind, container, key, expected), got ",
                t.size(), " items");
    Guard g{t[0].cast<int64_t>(), py::reinterpret_borrow<py::object>(t[1]),
            py::reinterpret_borrow<py::object>(t[2]), py::reinterpret_borrow<py::object>(t[3])};
    TORCH_CHECK(g.kind >= kItemIs && g.kind <= kAttrEqual, "fastpeft._C.SettledGemv: unknown guard kind ", g.kind);
    if (g.kind == kLengthIs) g.length = g.expected.cast<Py_ssize_t>();
    out.push_back(std::move(g));
  }
  return out;
}

bool all_hold(const std::vector<Guard>& guards) {
  for (const Guard& g : guards)
    if (!guard_holds(g)) return false;
  return true;
}

// One settled call: its input dtype, K and rows bucket (m_low, m_high], the dispatch state it was settled under
// (guards), and dense_lora_gemv's bound operands.
struct Entry {
  std::vector<Guard> guards;
  at::ScalarType dtype;
  int64_t K, m_low, m_high;
  at::Tensor W, A, B;
  c10::optional<at::Tensor> bias;
  double scale;
  int64_t prefetch;
  py::dict routes;
};

class SettledGemv {
 public:
  SettledGemv(const py::sequence& layer_guards, py::dict last)
      : layer_guards_(parse_guards(layer_guards)), last_(std::move(last)) {}

  void add(const py::sequence& guards, const at::Tensor& W, const c10::optional<at::Tensor>& bias,
           const at::Tensor& A, const at::Tensor& B, double scale, int64_t prefetch, int64_t K, int64_t m_low,
           int64_t m_high, py::dict routes) {
    TORCH_CHECK(prefetch == kPrefetchNone || prefetch == kPrefetchNonTemporal || prefetch == kPrefetchL2,
                "fastpeft._C.SettledGemv.add: prefetch must be 0, 1 or 2, got ", prefetch);
    TORCH_CHECK(K > 0 && 0 <= m_low && m_low < m_high, "fastpeft._C.SettledGemv.add: bad K or rows bucket");
    entries_.push_back(Entry{parse_guards(guards), W.scalar_type(), K, m_low, m_high, W, A, B, bias, scale, prefetch,
                             std::move(routes)});
  }

  // layer(x) by a settled call, or None where one of the call's conditions does not hold (the caller then takes
  // the Python path, which checks them again and settles anew).
  py::object call(const py::handle& x) {
    PyObject* o = x.ptr();
    if (at::GradMode::is_enabled() || Py_TYPE(o) != reinterpret_cast<PyTypeObject*>(THPVariableClass))
      return py::none();
    const at::Tensor& t = THPVariable_Unpack(o);
    // (a torch.func transform's wrapper has no storage: the kernels cannot read it)
    if (!t.has_storage() || t.layout() != at::kStrided || t.requires_grad() || t.dim() == 0 || !t.device().is_cpu() ||
        !t.is_contiguous() || at::autocast::is_autocast_enabled(at::kCPU))
      return py::none();
    const int64_t K = t.size(-1);
    if (K <= 0) return py::none();
    const int64_t M = t.numel() / K;
    for (const Entry& e : entries_) {
      if (t.scalar_type() != e.dtype || K != e.K || M <= e.m_low || M > e.m_high) continue;
      if (!all_hold(layer_guards_) || !all_hold(e.guards)) return py::none();
      // The bound parameters keep their identity through .to() and .data assignment: their dtype, device and
      // layout are read per call, as the Python path reads them.
      if (e.W.scalar_type() != e.dtype || !e.W.device().is_cpu() || e.W.dim() != 2 || e.W.size(1) != K ||
          e.W.stride(1) != 1 || e.A.scalar_type() != at::kFloat || !e.A.is_contiguous() ||
          e.B.scalar_type() != at::kFloat || !e.B.is_contiguous() || !e.A.device().is_cpu() ||
          !e.B.device().is_cpu() || (e.bias.has_value() && !e.bias->device().is_cpu()))
        return py::none();
      c10::optional<at::Tensor> bias32;
      if (e.bias.has_value()) bias32 = bias_as_reference_adds(*e.bias, e.dtype);
      at::Tensor y = dense_lora_gemv(t, e.W, bias32, c10::nullopt, e.B, e.scale, e.A, e.prefetch);
      if (PyDict_Update(last_.ptr(), e.routes.ptr()) < 0) throw py::error_already_set();
      ++served_;
      return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(y)));
    }
    return py::none();
  }

  int64_t served() const { return served_; }
  size_t size() const { return entries_.size(); }

  // The cyclic garbage collector's view. The guards hold the layer's own dicts, and the layer holds this object:
  // without these the cycle, and the weights it reaches, would outlive the model.
  int traverse(visitproc visit_one, void* arg) const {
    for (const std::vector<Guard>* list : guard_lists()) {
      for (const Guard& g : *list)
        for (const py::object* o : {&g.container, &g.key, &g.expected})
          if (o->ptr()) {
            const int status = visit_one(o->ptr(), arg);
            if (status) return status;
          }
    }
    for (const Entry& e : entries_)
      if (e.routes.ptr()) {
        const int status = visit_one(e.routes.ptr(), arg);
        if (status) return status;
      }
    if (last_.ptr()) return visit_one(last_.ptr(), arg);
    return 0;
  }

  // Drops everything it holds (the collector breaking a cycle): it then serves nothing.
  void clear() {
    layer_guards_.clear();
    entries_.clear();
    last_ = py::dict();
  }

 private:
  std::vector<const std::vector<Guard>*> guard_lists() const {
    std::vector<const std::vector<Guard>*> lists{&layer_guards_};
    for (const Entry& e : entries_) lists.push_back(&e.guards);
    return lists;
  }

  std::vector<Guard> layer_guards_;
  std::vector<Entry> entries_;
  py::dict last_;  // routing's op -> latest route, updated per served call as functional.SettledCall does
  int64_t served_ = 0;
};

// The type's garbage-collector slots: traverse and clear the objects a SettledGemv holds.
void collectable(PyHeapTypeObject* heap_type) {
  PyTypeObject* type = &heap_type->ht_type;
  type->tp_flags |= Py_TPFLAGS_HAVE_GC;
  type->tp_traverse = [](PyObject* self, visitproc visit, void* arg) -> int {
    Py_VISIT(Py_TYPE(self));  // a heap type's instances hold their type
    if (!py::detail::is_holder_constructed(self)) return 0;
    return py::cast<const SettledGemv&>(py::handle(self)).traverse(visit, arg);
  };
  type->tp_clear = [](PyObject* self) -> int {
    if (py::detail::is_holder_constructed(self)) py::cast<SettledGemv&>(py::handle(self)).clear();
    return 0;
  };
}

bool guards_hold(const py::sequence& guards) { return all_hold(parse_guards(guards)); }

}  // namespace

void register_settled_gemv(py::module& m) {
  py::class_<SettledGemv>(m, "SettledGemv",
                          "A fused LoRA layer's settled decode calls served from C++: "
                          "SettledGemv(layer_guards, last) holds the guards on the layer's state and the dict of "
                          "latest routes; add(guards, W, bias|None, A32, B32, scale, prefetch, K, m_low, m_high, "
                          "routes) binds one call (its dispatch guards, dense_lora_gemv's operands, the input's K "
                          "and rows bucket (m_low, m_high], the routes it records); __call__(x) -> y, or None where a "
                          "guard or a condition of the call fails",
                          py::custom_type_setup(collectable))
      .def(py::init<const py::sequence&, py::dict>(), py::arg("layer_guards"), py::arg("last"))
      .def("add", &SettledGemv::add, py::arg("guards"), py::arg("W"), py::arg("bias"), py::arg("A"), py::arg("B"),
           py::arg("scale"), py::arg("prefetch"), py::arg("K"), py::arg("m_low"), py::arg("m_high"),
           py::arg("routes"))
      .def("__call__", &SettledGemv::call, py::arg("x"))
      .def("__len__", &SettledGemv::size)
      .def_property_readonly("served", &SettledGemv::served, "calls served so far");
  m.def("guards_hold", &guards_hold, "([(kind, container, key, expected)]) -> whether every guard holds, as "
        "SettledGemv reads them (fastpeft/guards.py)");
}

}  // namespace fastpeft
