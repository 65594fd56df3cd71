/* One pass over a headerless, comma-separated vendor file that emits its typed columns.

   It takes only files in the strict vendor shape: every line has exactly the expected fields, ends in LF or
   CRLF (the last may end the file), and holds only printable ASCII; dates are real MM/DD/YYYY calendar dates,
   times HH:MM:SS with up to 6 fractional digits, decimals fit decimal(18,8) exactly (as schemas.DECIMAL_PATTERN
   says) and, where the contract asks, are above zero. Any other file returns -1 and is decoded by the Arrow path,
   which gives each line its reason: this kernel decides nothing that path would not, only faster. */

#include <stdint.h>

enum { K2_DATE = 0, K2_CLOCK = 1, K2_DECIMAL = 2, K2_POSITIVE_DECIMAL = 3, K2_TEXT = 4 };

static int is_digit(uint8_t c) { return c >= '0' && c <= '9'; }

/* Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's days_from_civil). */
static int64_t days_from_civil(int64_t y, int64_t m, int64_t d) {
    y -= m <= 2;
    const int64_t era = (y >= 0 ? y : y - 399) / 400;
    const int64_t yoe = y - era * 400;
    const int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    const int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/* Each parser reads its field from data[*pos] up to the byte before `end`, advances *pos past what it took, and
   returns 0 where the field is not in the strict shape; the caller then checks the delimiter after it. */

static int parse_date(const uint8_t *data, int64_t *pos, int64_t end, int32_t *out) {
    static const int month_days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    const uint8_t *p = data + *pos;
    if (end - *pos < 10 || p[2] != '/' || p[5] != '/') return 0;
    for (int i = 0; i < 10; i++)
        if (i != 2 && i != 5 && !is_digit(p[i])) return 0;
    int month = (p[0] - '0') * 10 + (p[1] - '0');
    int day = (p[3] - '0') * 10 + (p[4] - '0');
    int year = (p[6] - '0') * 1000 + (p[7] - '0') * 100 + (p[8] - '0') * 10 + (p[9] - '0');
    if (year == 0 || month < 1 || month > 12 || day < 1) return 0;
    int leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    if (day > month_days[month - 1] + (month == 2 && leap)) return 0;
    *out = (int32_t)days_from_civil(year, month, day);
    *pos += 10;
    return 1;
}

static int parse_clock(const uint8_t *data, int64_t *pos, int64_t end, int64_t *out) {
    const uint8_t *p = data + *pos;
    if (end - *pos < 8 || p[2] != ':' || p[5] != ':') return 0;
    for (int i = 0; i < 8; i++)
        if (i != 2 && i != 5 && !is_digit(p[i])) return 0;
    int hh = (p[0] - '0') * 10 + (p[1] - '0'), mm = (p[3] - '0') * 10 + (p[4] - '0'), ss = (p[6] - '0') * 10 + (p[7] - '0');
    if (hh > 23 || mm > 59 || ss > 59) return 0;
    int64_t i = 8, micros = 0, scale = 100000;
    if (*pos + i < end && p[i] == '.') {
        for (i++; *pos + i < end && is_digit(p[i]); i++, scale /= 10) {
            if (i > 14) return 0; /* more than 6 fractional digits */
            micros += (p[i] - '0') * scale;
        }
        if (i == 9) return 0; /* a point with no digit after it */
    }
    *out = ((int64_t)(hh * 60 + mm) * 60 + ss) * 1000000 + micros;
    *pos += i;
    return 1;
}

/* decimal(18,8) as an integer of 1e-8 units: 1 to 10 integer digits, an optional point, then at most 8
   fractional digits that count and any number of zeros after them. */
static int parse_decimal(const uint8_t *data, int64_t *pos, int64_t end, int positive, int64_t *out) {
    const uint8_t *p = data + *pos;
    int64_t n = end - *pos, i = 0, value = 0;
    while (i < n && is_digit(p[i])) value = value * 10 + (p[i++] - '0');
    if (i == 0 || i > 10) return 0;
    int64_t fraction = 0, digits = 0;
    if (i < n && p[i] == '.') {
        for (i++; i < n && is_digit(p[i]); i++) {
            if (digits < 8) {
                fraction = fraction * 10 + (p[i] - '0');
                digits++;
            } else if (p[i] != '0') {
                return 0;
            }
        }
    }
    for (; digits < 8; digits++) fraction *= 10;
    value = value * 100000000 + fraction;
    if (positive && value == 0) return 0;
    *out = value;
    *pos += i;
    return 1;
}

/* Returns the number of lines, or -1 if the file is not in the strict shape. `values[f]` receives field f's
   int32 days, int64 microseconds or Arrow decimal128 values (two int64 words each), or for a text field its
   n + 1 int32 offsets into
   `text[f]`, which must hold `size` bytes. Each output holds one slot per line (a line per LF, plus a last line
   without one): the caller sizes them from the count of LFs. */
int64_t k2_scan(const uint8_t *data, int64_t size, int n_fields, const int *types, void **values, uint8_t **text) {
    static uint8_t stops[256]; /* bytes that end a text field: the comma, controls, and all but printable ASCII */
    int64_t line = 0, pos = 0;
    int32_t used[16] = {0};
    if (n_fields < 1 || n_fields > 16 || size >= INT32_MAX) return -1;
    for (int c = 0; c < 256; c++) stops[c] = c == ',' || c < 0x20 || c > 0x7e;
    for (int f = 0; f < n_fields; f++)
        if (types[f] == K2_TEXT) ((int32_t *)values[f])[0] = 0;
    while (pos < size) {
        for (int f = 0; f < n_fields; f++) {
            int ok;
            switch (types[f]) {
                case K2_DATE: ok = parse_date(data, &pos, size, (int32_t *)values[f] + line); break;
                case K2_CLOCK: ok = parse_clock(data, &pos, size, (int64_t *)values[f] + line); break;
                case K2_DECIMAL:
                case K2_POSITIVE_DECIMAL: {
                    int64_t *wide = (int64_t *)values[f] + 2 * line; /* decimal128: low 64 bits, then high ones */
                    ok = parse_decimal(data, &pos, size, types[f] == K2_POSITIVE_DECIMAL, wide);
                    wide[1] = 0; /* never negative */
                    break;
                }
                case K2_TEXT: {
                    int64_t start = pos;
                    while (pos < size && !stops[data[pos]]) pos++;
                    int32_t n = (int32_t)(pos - start);
                    for (int32_t i = 0; i < n; i++) text[f][used[f] + i] = data[start + i];
                    used[f] += n;
                    ((int32_t *)values[f])[line + 1] = used[f];
                    ok = 1;
                    break;
                }
                default: ok = 0;
            }
            if (!ok) return -1;
            if (f < n_fields - 1) {
                if (pos >= size || data[pos] != ',') return -1;
                pos++;
            } else if (pos < size) { /* the line's end: LF or CRLF, or the end of the file */
                if (data[pos] == '\r') pos++;
                if (pos >= size || data[pos] != '\n') return -1;
                pos++;
            }
        }
        line++;
    }
    return line;
}

/* `prefix` followed by the decimal digits of each of `numbers` (none negative), as an Arrow string array's n + 1
   offsets and its data, which must hold n * (prefix_size + 19) bytes; returns the bytes written. */
int64_t k2_join_numbers(const uint8_t *prefix, int64_t prefix_size, const int64_t *numbers, int64_t n, int32_t *offsets,
                        uint8_t *data) {
    int64_t used = 0;
    offsets[0] = 0;
    for (int64_t row = 0; row < n; row++) {
        for (int64_t i = 0; i < prefix_size; i++) data[used + i] = prefix[i];
        used += prefix_size;
        uint8_t digits[20];
        int count = 0;
        uint64_t value = (uint64_t)numbers[row];
        do {
            digits[count++] = (uint8_t)('0' + value % 10);
            value /= 10;
        } while (value);
        while (count) data[used++] = digits[--count];
        offsets[row + 1] = (int32_t)used;
    }
    return used;
}
