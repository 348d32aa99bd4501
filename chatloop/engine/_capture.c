/* The eval callback of non-final stages, in C: it reads one graph node's output during llama_decode.
 *
 * ggml's scheduler asks the callback about every node of the graph (about 25 per layer) and llama.cpp
 * calls it on the thread that runs llama_decode. Written in Python, every one of those calls crossed
 * ctypes and took the GIL: about a millisecond per decode of a 22-layer stage, and a stall whenever the
 * event loop held the GIL. Here the whole decode runs without the GIL. See chatloop/engine/capture.py.
 *
 * The ggml functions come in through the state as pointers (taken from the already loaded libggml-base),
 * so this file needs no ggml header and links against nothing.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

typedef const char *(*get_name_fn)(const void *tensor);
typedef size_t (*nbytes_fn)(const void *tensor);
typedef void (*tensor_get_fn)(const void *tensor, void *data, size_t offset, size_t size);

/* Field for field the ctypes Structure in capture.py. */
struct capture_state {
    get_name_fn get_name;
    nbytes_fn nbytes;
    tensor_get_fn tensor_get;
    char target[64];  /* the node to read, e.g. "l_out-21" */
    char *buffer;     /* where its rows go, one decode's worth */
    size_t capacity;  /* bytes in buffer */
    size_t used;      /* bytes written since the caller last reset it */
    int overflow;     /* set when a node did not fit: the caller raises */
};

static bool capture_eval(void *tensor, bool ask, void *user_data) {
    struct capture_state *state = user_data;
    bool is_target = strcmp(state->get_name(tensor), state->target) == 0;
    if (ask) {
        return is_target;
    }
    if (!is_target) {
        return true;
    }
    size_t n = state->nbytes(tensor);
    if (state->used + n > state->capacity) {
        state->overflow = 1;
        return false;
    }
    state->tensor_get(tensor, state->buffer + state->used, 0, n);
    state->used += n;
    /* false stops the graph here: the final norm and the head are never computed. */
    return false;
}

static struct PyModuleDef capture_module = {
    PyModuleDef_HEAD_INIT, "_capture", "The C eval callback of non-final stages (see capture.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__capture(void) {
    PyObject *module = PyModule_Create(&capture_module);
    if (module == NULL) {
        return NULL;
    }
    PyObject *address = PyLong_FromVoidPtr((void *)capture_eval);
    if (address == NULL || PyModule_AddObject(module, "callback_address", address) < 0) {
        Py_XDECREF(address);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
