// First-fit-decreasing sequence packer (native core of engine/data/packing.py).
//
// Items are visited longest first (stable: equal lengths keep their input order); each goes into the
// lowest-numbered bin with room. "Lowest bin with room" is a leftmost search in a max segment tree over
// the bins' free space, so packing n items is O(n log n) instead of O(n * bins). Unopened bins hold
// the full capacity, so the search opens a new bin exactly when no open bin fits.
// The pure-Python fallback runs the same algorithm and must give identical packs (tested).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

// Returns (items, offsets): bin b holds items[offsets[b]:offsets[b+1]] in placement order.
static py::tuple pack_ffd(py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths_arr, int64_t capacity) {
  if (capacity <= 0) throw std::invalid_argument("capacity must be > 0");
  const int64_t n = lengths_arr.size();
  const int64_t* len = lengths_arr.data();
  for (int64_t i = 0; i < n; ++i) {
    if (len[i] <= 0 || len[i] > capacity)
      throw std::invalid_argument("item " + std::to_string(i) + " has length " + std::to_string(len[i]) +
                                  ", outside [1, capacity=" + std::to_string(capacity) + "]");
  }
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [len](int64_t a, int64_t b) { return len[a] > len[b]; });

  int64_t size = 1;
  while (size < std::max<int64_t>(n, 1)) size <<= 1;
  std::vector<int64_t> tree(2 * size, capacity);  // free space; internal nodes = max of children
  std::vector<int64_t> bin_of(n);
  int64_t num_bins = 0;
  {
    py::gil_scoped_release release;
    for (int64_t item : order) {
      const int64_t need = len[item];
      int64_t node = 1;
      while (node < size) node = (tree[2 * node] >= need) ? 2 * node : 2 * node + 1;
      const int64_t bin = node - size;
      tree[node] -= need;
      for (node >>= 1; node >= 1; node >>= 1) tree[node] = std::max(tree[2 * node], tree[2 * node + 1]);
      bin_of[item] = bin;
      num_bins = std::max(num_bins, bin + 1);
    }
  }
  py::array_t<int64_t> offsets(num_bins + 1);
  py::array_t<int64_t> items(n);
  int64_t* off = offsets.mutable_data();
  int64_t* out = items.mutable_data();
  std::fill(off, off + num_bins + 1, 0);
  for (int64_t i = 0; i < n; ++i) off[bin_of[i] + 1]++;
  for (int64_t b = 0; b < num_bins; ++b) off[b + 1] += off[b];
  std::vector<int64_t> cursor(off, off + num_bins);
  for (int64_t item : order) out[cursor[bin_of[item]]++] = item;  // placement order within each bin
  return py::make_tuple(items, offsets);
}

PYBIND11_MODULE(_packer_native, m) {
  m.doc() = "First-fit-decreasing packer (see engine/data/packing.py)";
  m.def("pack_ffd", &pack_ffd, py::arg("lengths"), py::arg("capacity"),
        "lengths int64[n], capacity -> (items int64[n], offsets int64[bins+1])");
}
